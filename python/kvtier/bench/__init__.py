"""kvtier benchmarks that run from the installed package (`kvtier bench ...`)."""
