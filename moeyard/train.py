"""Worker entry point: `torchrun -m moeyard.train CONFIG` or `mpirun ... python -m moeyard.train CONFIG`."""
from moeyard.launch.worker import main

if __name__ == "__main__":
    raise SystemExit(main())
