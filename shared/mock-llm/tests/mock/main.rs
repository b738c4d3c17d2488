//! End-to-end tests: start the mock with `spawn` and talk to it over HTTP.

mod anthropic;
mod common;
mod observe;
mod openai;
mod scenarios;
