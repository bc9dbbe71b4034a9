"""spark-submit's primary file for a Spark kernel: the Spark driver is the kernel launcher.

spark-submit runs a Python driver as a script, so this file imports the launcher by its
absolute name (the package must be installed in the driver's Python, spark.pyspark.python).
"""

import sys

from kernel_launchers.python_launcher import main

if __name__ == "__main__":
    sys.exit(main())
