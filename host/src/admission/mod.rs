//! Admission: who may send a request (auth), how often (rate limiter), and in which order it
//! reaches the scheduler (request queue).

pub mod auth;
pub mod queue;
pub mod rate_limiter;
