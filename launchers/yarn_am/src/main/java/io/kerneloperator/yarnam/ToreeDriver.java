package io.kerneloperator.yarnam;

import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.lang.reflect.InvocationTargetException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * The Spark driver of a Scala kernel on YARN: Apache Toree runs in this JVM (the cluster-mode
 * ApplicationMaster's, so {@code sc} is the application's own), as the seed's Scala launcher had
 * it. The Python launcher beside it does the rest, as for every other kernel: it picks the ports,
 * writes the connection file, reports to the operator, serves the signed control port and
 * supervises this process (its parent: {@code --kernel-pid}).
 *
 * <p>Usage, as spark-submit's main class: {@code ToreeDriver LAUNCHER_ARGUMENTS...}. The
 * launcher's Python is {@code RKO_LAUNCHER_PYTHON} (else {@code python3}); it prints the
 * connection file's path on a line of its own, and Toree is started on it with the launcher's
 * Spark initialization mode. When Toree ends (a shutdown request), the launcher is stopped and
 * the application ends; when the launcher ends first (the report was refused, or the operator
 * stopped the kernel), it stops this JVM.
 */
public final class ToreeDriver {
  static final String CONNECTION_LINE = "RKO-CONNECTION-FILE ";
  static final String TOREE_MAIN = "org.apache.toree.Main";

  private ToreeDriver() {}

  public static void main(String[] args) throws Exception {
    String python = System.getenv("RKO_LAUNCHER_PYTHON");
    List<String> command = new ArrayList<>();
    command.add(python == null || python.isEmpty() ? "python3" : python);
    command.add("-m");
    command.add("kernel_launchers.python_launcher");
    command.addAll(Arrays.asList(args));
    command.add("--kernel-pid");
    command.add(new File("/proc/self").getCanonicalFile().getName());
    Process launcher = new ProcessBuilder(command).redirectError(ProcessBuilder.Redirect.INHERIT).start();
    Runtime.getRuntime().addShutdownHook(new Thread(launcher::destroy, "stop-launcher"));
    BufferedReader out =
        new BufferedReader(new InputStreamReader(launcher.getInputStream(), StandardCharsets.UTF_8));
    String connection = null;
    for (String line = out.readLine(); line != null; line = out.readLine()) {
      if (line.startsWith(CONNECTION_LINE)) {
        connection = line.substring(CONNECTION_LINE.length()).trim();
        break;
      }
      System.out.println(line);
    }
    if (connection == null) {
      int code = launcher.waitFor();
      System.err.println(
          "The kernel launcher exited (code " + code + ") before it chose the kernel's ports.");
      System.exit(code == 0 ? 1 : code);
    }
    Thread drain = new Thread(() -> copy(out), "launcher-output");
    drain.setDaemon(true);
    drain.start();
    String[] toree = {
      "--profile", connection, "--spark-context-initialization-mode", option(args, "--spark-context-initialization-mode", "eager")
    };
    try {
      Class.forName(TOREE_MAIN, true, Thread.currentThread().getContextClassLoader())
          .getMethod("main", String[].class)
          .invoke(null, (Object) toree);
    } catch (InvocationTargetException e) {
      launcher.destroy();
      throw e.getCause() instanceof Exception ? (Exception) e.getCause() : e;
    }
    launcher.destroy();
  }

  static String option(String[] args, String name, String fallback) {
    for (int i = 0; i + 1 < args.length; i++) {
      if (args[i].equals(name)) {
        return args[i + 1];
      }
    }
    return fallback;
  }

  private static void copy(BufferedReader out) {
    try {
      for (String line = out.readLine(); line != null; line = out.readLine()) {
        System.out.println(line);
      }
    } catch (java.io.IOException e) {
      // the launcher ended
    }
  }
}
