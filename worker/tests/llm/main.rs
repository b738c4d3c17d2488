//! LLM provider tests, over real HTTP against the mock provider: the contract every adapter
//! passes (`contract`), and routing through the model table with retries, fallbacks and
//! restarts (`routing`), and usage a provider reports late or not at all (`usage`).

mod contract;
mod routing;
mod support;
mod usage;
