"""Test helpers (never imported by production code): gloo process groups, Megatron parallel state, tiny
recipes, and the one relative-error metric the kernel and reference tests compare with."""
