#!/usr/bin/env bash
# Builds the YARN pieces with Maven: the test YARN (tests/yarn_cluster, MiniYARNCluster behind a
# small entry point) and the kernel's ApplicationMaster (launchers/yarn_am). Maven's repository
# is .cache/m2 and the outputs are cached under .cache/yarn/<hash of the sources>, so a warm
# machine skips the build. Prints the output folder on its last line; progress goes to stderr.
#   <out>/rko-yarn-cluster.jar + <out>/cluster.classpath   java -cp ... io.kerneloperator.yarncluster.MiniYarn
#   <out>/rko-yarn-am.jar                                   the ApplicationMaster (RKO_YARN_AM_JAR)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
sources=$(cd "$root" && find tests/yarn_cluster launchers/yarn_am hack/yarn/build.sh -type f \
  \( -name '*.java' -o -name 'pom.xml' -o -name 'build.sh' \) ! -path '*/target/*' | sort)
hash=$(cd "$root" && cat $sources | sha256sum | cut -c1-12)
out="$root/.cache/yarn/$hash"
if [[ -f "$out/rko-yarn-am.jar" && -f "$out/cluster.classpath" ]]; then
  echo "The YARN jars are cached in $out" >&2
  echo "$out"
  exit 0
fi
command -v mvn >/dev/null || { echo "yarn/build.sh: Maven is missing; run hack/install-system-deps.sh." >&2; exit 1; }
echo "Building the test YARN and the kernel ApplicationMaster with Maven (Hadoop from Maven Central, once)..." >&2
start=$(date +%s)
repo="$root/.cache/m2"
work="$root/.cache/yarn/.build"
rm -rf "$work" && mkdir -p "$work" "$repo"
mvn_() { mvn -B -q -Dmaven.repo.local="$repo" "$@" >&2; }
for module in tests/yarn_cluster launchers/yarn_am; do
  cp -r "$root/$module" "$work/$(basename "$module")"
done
mvn_ -f "$work/yarn_cluster/pom.xml" package dependency:build-classpath \
  -Dmdep.outputFile="$work/cluster.classpath" -Dmdep.includeScope=runtime
mvn_ -f "$work/yarn_am/pom.xml" package
mkdir -p "$out"
cp "$work/yarn_cluster/target/rko-yarn-cluster-1.jar" "$out/rko-yarn-cluster.jar"
cp "$work/yarn_am/target/rko-yarn-am-1.jar" "$out/rko-yarn-am.jar"
cp "$work/cluster.classpath" "$out/cluster.classpath"
rm -rf "$work"
# Keep one build per machine.
find "$root/.cache/yarn" -mindepth 1 -maxdepth 1 -type d ! -path "$out" -exec rm -rf {} +
echo "Built the YARN jars in $out in $(( $(date +%s) - start )) s." >&2
echo "$out"
