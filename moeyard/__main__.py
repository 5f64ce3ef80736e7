"""`python -m moeyard ...` is the `moeyard` command."""
from moeyard.errors import exit_process
from moeyard.launch.cli import main

if __name__ == "__main__":
    exit_process(main())
