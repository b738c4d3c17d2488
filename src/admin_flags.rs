//! Parsing of `switchyard admin set-tenant`'s flag values (checked before anything changes).

/// `wall_ms=N,cpu_ms=N,memory_mb=N,output_bytes=N` (any subset) or `default`.
pub(crate) fn parse_code_limits(
    spec: &str,
) -> anyhow::Result<Option<switchyard_core::code::LimitsRequest>> {
    if spec.trim() == "default" {
        return Ok(None);
    }
    let mut l = switchyard_core::code::LimitsRequest::default();
    for (k, n) in assignments(spec)? {
        match k.as_str() {
            "wall_ms" => l.wall_ms = Some(n),
            "cpu_ms" => l.cpu_ms = Some(n),
            "memory_mb" => l.memory_mb = Some(n),
            "output_bytes" => l.output_bytes = Some(n),
            other => {
                anyhow::bail!("unknown limit `{other}` (wall_ms, cpu_ms, memory_mb, output_bytes)")
            }
        }
    }
    Ok(Some(l))
}

/// `--queue-weight`: 1 to 1000, or `default` (`None`).
pub(crate) fn parse_queue_weight(spec: &str) -> anyhow::Result<Option<i32>> {
    match spec {
        "default" => Ok(None),
        n => n
            .parse::<i32>()
            .ok()
            .filter(|w| (1..=1000).contains(w))
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("--queue-weight: 1 to 1000, or `default`")),
    }
}

/// `--job-retention-days`: days (0: forever), or `default` (`None`).
pub(crate) fn parse_retention_days(spec: &str) -> anyhow::Result<Option<i32>> {
    match spec {
        "default" => Ok(None),
        n => n
            .parse::<i32>()
            .ok()
            .filter(|d| *d >= 0)
            .map(Some)
            .ok_or_else(|| {
                anyhow::anyhow!("--job-retention-days: a number of days (0: forever) or `default`")
            }),
    }
}

/// `requests_per_minute=N,concurrent_jobs=N,llm_tokens_per_day=N,sandbox_cpu_seconds_per_day=N,
/// max_queued_jobs=N` (any subset) or `default`.
pub(crate) fn parse_quotas(
    spec: &str,
) -> anyhow::Result<Option<switchyard_core::quota::QuotaLimits>> {
    if spec.trim() == "default" {
        return Ok(None);
    }
    let mut q = switchyard_core::quota::QuotaLimits::default();
    for (k, n) in assignments(spec)? {
        match k.as_str() {
            "requests_per_minute" => q.requests_per_minute = Some(n),
            "concurrent_jobs" => q.concurrent_jobs = Some(n),
            "llm_tokens_per_day" => q.llm_tokens_per_day = Some(n),
            "sandbox_cpu_seconds_per_day" => q.sandbox_cpu_seconds_per_day = Some(n),
            "max_queued_jobs" => q.max_queued_jobs = Some(n),
            other => anyhow::bail!(
                "unknown quota `{other}` (requests_per_minute, concurrent_jobs, \
                 llm_tokens_per_day, sandbox_cpu_seconds_per_day, max_queued_jobs)"
            ),
        }
    }
    Ok(Some(q))
}

/// `name=N,...` with positive integers.
fn assignments(spec: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("`{part}`: expected name=value"))?;
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("`{part}`: the value must be a positive integer"))?;
        anyhow::ensure!(n > 0, "`{part}`: the value must be at least 1");
        out.push((k.trim().to_string(), n));
    }
    Ok(out)
}
