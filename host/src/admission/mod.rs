//! Admission: the one stage every generation request passes, whatever its endpoint.
//!
//! The HTTP layer parses and renders; [`Admission::admit`] decides: the authenticated client id
//! → rate limit (plugins or built-in) → priority → bounded queue → handed to the scheduler. The
//! [`Admitted`] request's token events come back through [`SequenceEvents`], which also record
//! what the request used when it ends, however it ends (finished, stopped, cancelled by a
//! disconnect, failed, timed out), so a client cannot dodge a token budget by hanging up.
//!
//! Leaf mechanisms live beside it: API keys (`auth`), the built-in limiter (`rate_limiter`),
//! the priority queue (`queue`), and the plugin policy calls (`policy`).

pub mod auth;
pub mod client_slots;
mod policy;
pub mod queue;
pub mod rate_limiter;
mod stage;
mod usage;

pub use policy::Policy;
pub use stage::{Admission, SequenceSpec, Ticket};
pub use usage::{Admitted, Outcome, SequenceEvents};
