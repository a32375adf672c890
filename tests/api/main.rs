//! The HTTP-level test binary: one process, one module per area, `spawn_app()` in `helpers`.

mod edge;
mod health;
mod helpers;
mod isolation;
mod resolution;
