"""One module per family of `moeyard` subcommands."""
