"""Worker entry point: `torchrun -m moeyard.train CONFIG` or `mpirun ... python -m moeyard.train CONFIG`."""
from moeyard.errors import exit_process
from moeyard.launch.worker import main

if __name__ == "__main__":
    exit_process(main())
