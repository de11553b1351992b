//! Host bindings generated from `wit/policy.wit`, one module per world. The rate-limiter
//! module owns the shared `types` and `host` interfaces; the other worlds reuse them so one
//! `RequestInfo` and one host implementation serve all three.

#![allow(clippy::all, missing_docs)]

pub mod limiter {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "rate-limiter",
    });
}

pub mod prioritizer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "prioritizer",
        with: {
            "cllm:policy/types": super::limiter::cllm::policy::types,
            "cllm:policy/host": super::limiter::cllm::policy::host,
        },
    });
}

pub mod health {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "health-checker",
        with: {
            "cllm:policy/types": super::limiter::cllm::policy::types,
            "cllm:policy/host": super::limiter::cllm::policy::host,
        },
    });
}

pub use limiter::cllm::policy::host::LogLevel;
pub use limiter::cllm::policy::types::{
    Decision, HealthReport, HealthSnapshot, HealthStatus, Rejection, RequestInfo, Usage,
};

/// A health verdict's name, as metrics and `cllm plugin check` print it.
pub fn health_status_name(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unhealthy => "unhealthy",
    }
}
