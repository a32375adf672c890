//! Audit log benchmarks (placeholder until written; see docs/PERFORMANCE.md).

fn main() {}
