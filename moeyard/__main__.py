"""`python -m moeyard ...` is the `moeyard` command."""
from moeyard.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
