//! LLM provider tests, over real HTTP against the mock provider: the contract every adapter
//! passes (`contract`), and routing through the model table with retries, fallbacks and
//! restarts (`routing`), usage a provider reports late or not at all (`usage`), and the windows
//! of models outside the table, learned from their refusals (`window`).

mod contract;
mod routing;
mod support;
mod usage;
mod window;
