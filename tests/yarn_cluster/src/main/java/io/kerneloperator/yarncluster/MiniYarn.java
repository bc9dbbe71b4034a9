package io.kerneloperator.yarncluster;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.nio.charset.StandardCharsets;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.yarn.conf.YarnConfiguration;
import org.apache.hadoop.yarn.server.MiniYARNCluster;
import org.apache.hadoop.yarn.server.nodemanager.health.NodeHealthCheckerService;

/**
 * The test suite's YARN: one ResourceManager and one NodeManager in this JVM, on loopback.
 *
 * <p>Usage: {@code MiniYarn WORK_DIR}. Writes WORK_DIR/conf/{yarn-site,core-site}.xml (a
 * HADOOP_CONF_DIR for spark-submit) and prints {@code RM_WEB http://HOST:PORT} then
 * {@code READY}. Reads commands on stdin: {@code restart-rm} restarts the ResourceManager on
 * the same ports with its state recovered (work-preserving), {@code stop} or end of input stops
 * everything. Ports are fixed at start so that a restarted ResourceManager keeps its address.
 */
public final class MiniYarn {
  private MiniYarn() {}

  private static int freePort() throws IOException {
    try (ServerSocket socket = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
      return socket.getLocalPort();
    }
  }

  private static String loopback() throws IOException {
    return "127.0.0.1:" + freePort();
  }

  static YarnConfiguration configuration(File workDir) throws IOException {
    YarnConfiguration conf = new YarnConfiguration();
    conf.setBoolean(YarnConfiguration.YARN_MINICLUSTER_FIXED_PORTS, true);
    conf.set(YarnConfiguration.RM_ADDRESS, loopback());
    conf.set(YarnConfiguration.RM_SCHEDULER_ADDRESS, loopback());
    conf.set(YarnConfiguration.RM_RESOURCE_TRACKER_ADDRESS, loopback());
    conf.set(YarnConfiguration.RM_ADMIN_ADDRESS, loopback());
    conf.set(YarnConfiguration.RM_WEBAPP_ADDRESS, loopback());
    conf.set(YarnConfiguration.NM_ADDRESS, loopback());
    conf.set(YarnConfiguration.NM_LOCALIZER_ADDRESS, loopback());
    conf.set(YarnConfiguration.NM_WEBAPP_ADDRESS, loopback());
    conf.set(YarnConfiguration.NM_COLLECTOR_SERVICE_ADDRESS, loopback());
    conf.setBoolean(YarnConfiguration.TIMELINE_SERVICE_ENABLED, false);
    // The NodeManager talks to the ResourceManager over RPC, so it re-registers after a restart.
    conf.setBoolean(YarnConfiguration.YARN_MINICLUSTER_USE_RPC, true);
    // Reconnect within a second after a restart, not YARN's default 30 s (NodeManager and AMs).
    conf.setLong(YarnConfiguration.RESOURCEMANAGER_CONNECT_RETRY_INTERVAL_MS, 500);
    // Small containers, no memory policing: kernels and Spark drivers fit on a laptop.
    conf.setInt(YarnConfiguration.RM_SCHEDULER_MINIMUM_ALLOCATION_MB, 64);
    conf.setInt(YarnConfiguration.NM_PMEM_MB, 8192);
    conf.setInt(YarnConfiguration.NM_VCORES, 8);
    conf.setBoolean(YarnConfiguration.NM_PMEM_CHECK_ENABLED, false);
    conf.setBoolean(YarnConfiguration.NM_VMEM_CHECK_ENABLED, false);
    // The NodeManager's directories share this machine's disk; YARN's default marks them bad at
    // 90 % used, and then the node has no resources and every application waits forever. Only a
    // full disk counts here: how full the host's disk is must not decide whether tests pass.
    conf.setFloat(YarnConfiguration.NM_MAX_PER_DISK_UTILIZATION_PERCENTAGE, 100.0f);
    conf.setLong(YarnConfiguration.NM_MIN_PER_DISK_FREE_SPACE_MB, 0);
    // Queues: 'default' has the room; 'tiny' can never fit an ApplicationMaster.
    conf.set("yarn.scheduler.capacity.root.queues", "default,tiny");
    conf.set("yarn.scheduler.capacity.root.default.capacity", "99");
    conf.set("yarn.scheduler.capacity.root.default.maximum-am-resource-percent", "1.0");
    conf.set("yarn.scheduler.capacity.root.tiny.capacity", "1");
    conf.set("yarn.scheduler.capacity.root.tiny.maximum-capacity", "1");
    // Work-preserving restart: applications and their containers survive a ResourceManager restart.
    conf.setBoolean(YarnConfiguration.RECOVERY_ENABLED, true);
    conf.set(YarnConfiguration.RM_STORE,
        "org.apache.hadoop.yarn.server.resourcemanager.recovery.FileSystemRMStateStore");
    conf.set(YarnConfiguration.FS_RM_STATE_STORE_URI, new File(workDir, "rm-state").toURI().toString());
    conf.setBoolean(YarnConfiguration.RM_WORK_PRESERVING_RECOVERY_ENABLED, true);
    // Whoever runs the suite may submit on behalf of others (spark-submit --proxy-user).
    String self = System.getProperty("user.name");
    conf.set("hadoop.proxyuser." + self + ".hosts", "*");
    conf.set("hadoop.proxyuser." + self + ".groups", "*");
    conf.set("fs.defaultFS", "file:///");
    return conf;
  }

  private static void write(Configuration conf, File file) throws IOException {
    try (OutputStream out = new FileOutputStream(file)) {
      conf.writeXml(out);
    }
  }

  private static void restartResourceManager(MiniYARNCluster cluster) throws Exception {
    cluster.restartResourceManager(0);
    if (!cluster.waitForNodeManagersToConnect(60_000)) {
      throw new IllegalStateException("the NodeManager did not register again within 60 s");
    }
  }

  /** An unhealthy NodeManager registers but offers no resources: say why now, not as a 60 s
   * queue wait in every test. */
  private static void requireHealthyNodeManager(MiniYARNCluster cluster) {
    NodeHealthCheckerService health = cluster.getNodeManager(0).getNodeHealthChecker();
    if (!health.isHealthy()) {
      throw new IllegalStateException("the NodeManager is unhealthy: " + health.getHealthReport());
    }
  }

  private static void start(MiniYARNCluster cluster, YarnConfiguration conf) throws Exception {
    cluster.init(conf);
    cluster.start();
    if (!cluster.waitForNodeManagersToConnect(60_000)) {
      throw new IllegalStateException("the NodeManager did not register within 60 s");
    }
    // Guice serves one web pipeline per JVM (GuiceFilter's is static): the web app started last
    // answers on every port. The NodeManager starts after the ResourceManager, so restart the
    // ResourceManager once to make its REST API the one served.
    restartResourceManager(cluster);
    requireHealthyNodeManager(cluster);
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 1) {
      System.err.println("usage: MiniYarn WORK_DIR");
      System.exit(2);
    }
    File workDir = new File(args[0]);
    File confDir = new File(workDir, "conf");
    if (!confDir.mkdirs() && !confDir.isDirectory()) {
      throw new IOException("cannot create " + confDir);
    }
    // MiniYARNCluster puts its NodeManager's directories under test.build.data.
    System.setProperty("test.build.data", new File(workDir, "data").getAbsolutePath());
    long started = System.nanoTime();
    YarnConfiguration conf = configuration(workDir);
    MiniYARNCluster cluster = new MiniYARNCluster("rko", 1, 1, 1);
    try {
      start(cluster, conf);
    } catch (IllegalStateException e) {
      // One line the caller can quote, rather than "see the log".
      System.out.println("FAILED " + e.getMessage());
      System.out.flush();
      cluster.stop();
      System.exit(1);
    }
    Configuration effective = cluster.getConfig();
    write(effective, new File(confDir, "yarn-site.xml"));
    write(effective, new File(confDir, "core-site.xml"));
    System.out.println("RM_WEB http://" + effective.get(YarnConfiguration.RM_WEBAPP_ADDRESS));
    System.out.println("RM_ADDRESS " + effective.get(YarnConfiguration.RM_ADDRESS));
    System.out.printf("STARTED_IN %.1f%n", (System.nanoTime() - started) / 1e9);
    System.out.println("READY");
    System.out.flush();
    Runtime.getRuntime().addShutdownHook(new Thread(cluster::stop));
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    for (String line = in.readLine(); line != null; line = in.readLine()) {
      String command = line.trim();
      if (command.equals("stop")) {
        break;
      } else if (command.equals("restart-rm")) {
        restartResourceManager(cluster);
        System.out.println("RM_RESTARTED");
      } else if (!command.isEmpty()) {
        System.out.println("UNKNOWN " + command);
      }
      System.out.flush();
    }
    cluster.stop();
    System.out.println("STOPPED");
    System.out.flush();
    System.exit(0);
  }
}
