//! LLM provider tests, over real HTTP against the mock provider: the contract every adapter
//! passes (`contract`), and routing through the model table with retries, fallbacks and
//! restarts (`routing`).

mod contract;
mod routing;
mod support;
