"""The MoE layer as a local computation: routers, token permutation, stacked experts."""
