//! Host bindings generated from the WIT contract, for every version cllm supports: `v2`
//! (`wit/policy.wit`, `cllm:policy@0.2.0`) and `v1` (`wit/v0.1.0/policy.wit`, frozen). Each
//! version has one module per world; the rate-limiter module owns the version's shared
//! interfaces and the other worlds reuse them. The rest of cllm speaks 0.2.0's types (re-exported
//! here); [`v1`]'s conversions turn them into what a 0.1.0 plugin expects and back.

#![allow(clippy::all, missing_docs)]

pub mod v2 {
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
                "cllm:policy/counters": super::limiter::cllm::policy::counters,
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
                "cllm:policy/counters": super::limiter::cllm::policy::counters,
            },
        });
    }
}

pub mod v1 {
    pub mod limiter {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "rate-limiter",
        });
    }

    pub mod prioritizer {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "prioritizer",
            with: {
                "cllm:policy/types": super::limiter::cllm::policy::types,
                "cllm:policy/host": super::limiter::cllm::policy::host,
            },
        });
    }

    pub mod health {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "health-checker",
            with: {
                "cllm:policy/types": super::limiter::cllm::policy::types,
                "cllm:policy/host": super::limiter::cllm::policy::host,
            },
        });
    }

    use limiter::cllm::policy::types as old;

    /// 0.1.0's request info: 0.2.0's without `api` and `model`.
    pub fn request_info(info: &super::RequestInfo) -> old::RequestInfo {
        old::RequestInfo {
            request_id: info.request_id.clone(),
            client_id: info.client_id.clone(),
            endpoint: info.endpoint.clone(),
            prompt_tokens: info.prompt_tokens,
            max_new_tokens: info.max_new_tokens,
            requested_priority: info.requested_priority,
            headers: info.headers.clone(),
        }
    }

    /// 0.1.0's usage: 0.2.0's without `outcome`.
    pub fn usage(usage: &super::Usage) -> old::Usage {
        old::Usage {
            request_id: usage.request_id.clone(),
            client_id: usage.client_id.clone(),
            prompt_tokens: usage.prompt_tokens,
            generated_tokens: usage.generated_tokens,
        }
    }

    pub fn health_snapshot(s: &super::HealthSnapshot) -> old::HealthSnapshot {
        old::HealthSnapshot {
            queue_size: s.queue_size,
            max_queue_size: s.max_queue_size,
            running_sequences: s.running_sequences,
            kv_blocks_used: s.kv_blocks_used,
            kv_blocks_total: s.kv_blocks_total,
            requests_per_second: s.requests_per_second,
            average_wait_ms: s.average_wait_ms,
            p99_time_to_first_token_ms: s.p99_time_to_first_token_ms,
            ms_since_last_step: s.ms_since_last_step,
            error_rate: s.error_rate,
        }
    }

    pub fn decision(d: old::Decision) -> super::Decision {
        match d {
            old::Decision::Allow => super::Decision::Allow,
            old::Decision::Reject(r) => super::Decision::Reject(super::Rejection {
                retry_after_ms: r.retry_after_ms,
                reason: r.reason,
            }),
        }
    }

    pub fn health_report(r: old::HealthReport) -> super::HealthReport {
        let status = match r.status {
            old::HealthStatus::Healthy => super::HealthStatus::Healthy,
            old::HealthStatus::Degraded => super::HealthStatus::Degraded,
            old::HealthStatus::Unhealthy => super::HealthStatus::Unhealthy,
        };
        super::HealthReport {
            status,
            message: r.message,
        }
    }

    pub use limiter::cllm::policy::host::LogLevel;
}

pub use v2::limiter::cllm::policy::host::LogLevel;
pub use v2::limiter::cllm::policy::types::{
    Api, Decision, HealthReport, HealthSnapshot, HealthStatus, Outcome, Rejection, RequestInfo,
    Usage,
};

/// A health verdict's name, as metrics and `cllm plugin check` print it.
pub fn health_status_name(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unhealthy => "unhealthy",
    }
}
