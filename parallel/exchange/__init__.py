"""Token exchange for expert parallelism: dispatch/combine all-to-all and the pipelined executor."""
