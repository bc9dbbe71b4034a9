package io.kerneloperator.yarnam;

import java.io.File;
import java.io.IOException;
import java.io.RandomAccessFile;
import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.TimeUnit;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.io.Text;
import org.apache.hadoop.security.Credentials;
import org.apache.hadoop.security.UserGroupInformation;
import org.apache.hadoop.yarn.api.records.FinalApplicationStatus;
import org.apache.hadoop.yarn.client.api.AMRMClient;
import org.apache.hadoop.yarn.client.api.AMRMClient.ContainerRequest;
import org.apache.hadoop.yarn.conf.YarnConfiguration;

/**
 * A YARN ApplicationMaster whose only work is to run the kernel launcher and report its end.
 *
 * <p>Usage: {@code LauncherAM LAUNCHER_COMMAND...}. It registers with the ResourceManager (so
 * the application is RUNNING and is not expired as a silent AM), heartbeats while the launcher
 * runs, and unregisters with SUCCEEDED or FAILED and the end of the launcher's log as YARN's
 * diagnostics. The launch token arrives as the secret {@code rko.launch.token} in the
 * application's credentials and is handed over in a 0600 file, never on a command line.
 * Killing the application through the ResourceManager ends the container's process group, and
 * with it the launcher and the kernel.
 */
public final class LauncherAM {
  static final Text TOKEN_SECRET = new Text("rko.launch.token");
  static final long HEARTBEAT_MS = 1000;
  static final int DIAGNOSTICS_CHARS = 1500;

  private LauncherAM() {}

  static String tail(File file, int chars) {
    try (RandomAccessFile in = new RandomAccessFile(file, "r")) {
      long start = Math.max(0, in.length() - chars);
      byte[] bytes = new byte[(int) (in.length() - start)];
      in.seek(start);
      in.readFully(bytes);
      return new String(bytes, StandardCharsets.UTF_8).trim();
    } catch (IOException err) {
      return "";
    }
  }

  /** The application's credentials: the container's token file, else the current user's. */
  static Credentials credentials(Configuration conf) throws IOException {
    String tokenFile = System.getenv(UserGroupInformation.HADOOP_TOKEN_FILE_LOCATION);
    if (tokenFile != null && new File(tokenFile).isFile()) {
      return Credentials.readTokenStorageFile(new File(tokenFile), conf);
    }
    return UserGroupInformation.getCurrentUser().getCredentials();
  }

  static List<String> withTokenFile(List<String> command, File workDir, Configuration conf) throws IOException {
    byte[] token = credentials(conf).getSecretKey(TOKEN_SECRET);
    if (token == null) {
      System.err.println("No " + TOKEN_SECRET + " secret in the application's credentials.");
      return command;
    }
    File file = new File(workDir, "rko-launch-token");
    Files.write(file.toPath(), token);
    Files.setPosixFilePermissions(file.toPath(), PosixFilePermissions.fromString("rw-------"));
    List<String> full = new ArrayList<>(command);
    full.add("--token-file");
    full.add(file.getAbsolutePath());
    return full;
  }

  public static void main(String[] args) throws Exception {
    if (args.length == 0) {
      System.err.println("usage: LauncherAM LAUNCHER_COMMAND...");
      System.exit(2);
    }
    File workDir = new File(".").getAbsoluteFile();
    String logDirs = System.getenv("LOG_DIRS");
    File logDir = logDirs == null ? workDir : new File(logDirs.split(",")[0]);
    File launcherLog = new File(logDir, "launcher.log");

    Configuration conf = new YarnConfiguration();
    AMRMClient<ContainerRequest> rm = AMRMClient.createAMRMClient();
    rm.init(conf);
    rm.start();
    rm.registerApplicationMaster(InetAddress.getLocalHost().getHostName(), 0, "");

    ProcessBuilder builder = new ProcessBuilder(withTokenFile(Arrays.asList(args), workDir, conf));
    builder.redirectErrorStream(true);
    builder.redirectOutput(ProcessBuilder.Redirect.appendTo(launcherLog));
    builder.redirectInput(ProcessBuilder.Redirect.from(new File("/dev/null")));
    Process launcher = builder.start();
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      // SIGTERM from the NodeManager (the application was killed): pass it on, briefly wait.
      if (launcher.isAlive()) {
        launcher.destroy();
        try {
          launcher.waitFor(3, TimeUnit.SECONDS);
        } catch (InterruptedException err) {
          Thread.currentThread().interrupt();
        }
      }
    }));

    while (!launcher.waitFor(HEARTBEAT_MS, TimeUnit.MILLISECONDS)) {
      try {
        rm.allocate(0.5f);
      } catch (Exception err) {
        // The ResourceManager may be restarting; the client re-registers once it is back.
        System.err.println("Heartbeat failed, retrying: " + err);
      }
    }
    int code = launcher.exitValue();
    FinalApplicationStatus status = code == 0 ? FinalApplicationStatus.SUCCEEDED : FinalApplicationStatus.FAILED;
    String diagnostics = "The kernel launcher exited with code " + code + ".";
    if (code != 0) {
      diagnostics += " End of its log:\n" + tail(launcherLog, DIAGNOSTICS_CHARS);
    }
    rm.unregisterApplicationMaster(status, diagnostics, "");
    rm.stop();
    System.exit(code == 0 ? 0 : 1);
  }
}
