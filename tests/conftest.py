pytest_plugins = ["tests._broker", "tests._s3", "tests._redis"]
