//! The admin and compliance API under `/api/v1`, end to end over HTTP against the real application
//! with two tenants: object-level authorization, credentials, roles and scopes, validation, auditing
//! of every change, the export, the rate limit, the OpenAPI document and `/metrics`, and what the
//! edge answers to absent or malformed bodies, paths and queries.

mod audit;
mod credentials;
mod edge;
mod helpers;
mod isolation;
mod ops;
mod validation;
