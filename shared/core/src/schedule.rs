//! Cron schedules: the `POST /v1/schedules` body, five-field cron expressions evaluated in an
//! IANA time zone, and the fire times the scheduler enqueues.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::FieldError;
use crate::job::parse_at;

/// Longest schedule name.
pub const MAX_NAME: usize = 200;

/// Body of `POST /v1/schedules`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateScheduleRequest {
    /// A label for people.
    pub name: Option<String>,
    /// Five fields (minute hour day-of-month month day-of-week, e.g. `*/15 9-17 * * 1-5`) or an
    /// alias (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`).
    pub cron: String,
    /// IANA time zone the expression is read in (default `UTC`), e.g. `Europe/Paris`.
    pub timezone: Option<String>,
    /// The job each run submits: a `POST /v1/jobs` body without `run_at`/`delay_s`.
    #[schema(value_type = Object)]
    pub job: Value,
    /// Created paused (no runs until resumed).
    #[serde(default)]
    pub paused: bool,
}

/// Body of `PATCH /v1/schedules/{id}`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateScheduleRequest {
    /// Pause (no runs) or resume (the next run is the next fire time from now).
    pub paused: bool,
}

/// A schedule as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    pub id: Uuid,
    pub name: Option<String>,
    pub cron: String,
    pub timezone: String,
    #[schema(value_type = Object)]
    pub job: Value,
    pub paused: bool,
    /// The next fire time (a paused schedule does not fire).
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// Recent runs, newest first (on `GET /v1/schedules/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<ScheduleRun>>,
}

/// One fire time of a schedule: the job it enqueued, or why it enqueued none.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleRun {
    pub fire_at: DateTime<Utc>,
    /// The run's job (`null` when the run was skipped).
    pub job_id: Option<Uuid>,
    /// Why the scheduler enqueued no job at this fire time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<RunSkipped>,
}

/// A fire time the scheduler refused: what a `POST /v1/jobs` of the template would have been
/// refused with at that moment (`code` is a stable error code: `quota_exceeded` for the daily
/// quotas and `max_queued_jobs`, `forbidden` when the model is no longer enabled for the tenant
/// or the API key that created the schedule was revoked or expired, `invalid_input` when the
/// template no longer makes a valid job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunSkipped {
    pub code: String,
    pub message: String,
}

/// A parsed cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl CronSpec {
    /// Parses `cron` (five fields or an `@` alias) and the IANA zone `tz`.
    pub fn parse(cron: &str, tz: &str) -> Result<CronSpec, FieldError> {
        let trimmed = cron.trim();
        let fields = trimmed.split_whitespace().count();
        if !trimmed.starts_with('@') && fields != 5 {
            return Err(FieldError::invalid(
                "cron",
                format!("expected five fields (minute hour day-of-month month day-of-week), got {fields}"),
            ));
        }
        let cron = croner::Cron::from_str(trimmed)
            .map_err(|e| FieldError::invalid("cron", format!("invalid cron expression: {e}")))?;
        let tz = chrono_tz::Tz::from_str(tz).map_err(|_| {
            FieldError::invalid(
                "timezone",
                format!("`{tz}` is not an IANA time zone (e.g. UTC, Europe/Paris)"),
            )
        })?;
        let spec = CronSpec { cron, tz };
        if spec.next_after(Utc::now()).is_none() {
            return Err(FieldError::invalid("cron", "the expression never fires"));
        }
        Ok(spec)
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }
}

impl CreateScheduleRequest {
    /// Parses the body; the job template is checked by the caller (it needs the tenant).
    pub fn parse(body: &Value) -> Result<(CreateScheduleRequest, CronSpec), FieldError> {
        if !body.is_object() {
            return Err(FieldError::invalid("body", "must be a JSON object"));
        }
        let req: CreateScheduleRequest = parse_at("", body)?;
        if let Some(n) = &req.name {
            if n.chars().count() > MAX_NAME {
                return Err(FieldError::invalid(
                    "name",
                    format!("at most {MAX_NAME} characters"),
                ));
            }
        }
        let spec = CronSpec::parse(&req.cron, req.timezone.as_deref().unwrap_or("UTC"))?;
        if !req.job.is_object() {
            return Err(FieldError::invalid("job", "must be a job object"));
        }
        for f in ["run_at", "delay_s"] {
            if req.job.get(f).is_some() {
                return Err(FieldError::invalid(
                    format!("job.{f}"),
                    "a scheduled job starts at its fire time",
                ));
            }
        }
        Ok((req, spec))
    }
}

/// `e` with its field placed under `prefix` (`input.model` → `job.input.model`).
pub fn nest_field(prefix: &str, mut e: FieldError) -> FieldError {
    e.field = if e.field.is_empty() || e.field == "body" {
        prefix.to_string()
    } else {
        format!("{prefix}.{}", e.field)
    };
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn fire_times_follow_the_time_zone() {
        let s = CronSpec::parse("0 9 * * *", "Asia/Kolkata").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 0, 0, 0).unwrap();
        // 09:00 in Kolkata is 03:30 UTC
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 3, 3, 30, 0).unwrap()
        );
        let every = CronSpec::parse("*/15 * * * *", "UTC").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 10, 15, 0).unwrap();
        assert_eq!(
            every.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 3, 10, 30, 0).unwrap(),
            "strictly after"
        );
        assert!(CronSpec::parse("@hourly", "UTC").is_ok());
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        assert_eq!(CronSpec::parse("* * * *", "UTC").unwrap_err().field, "cron");
        assert_eq!(
            CronSpec::parse("0 0 * * * *", "UTC").unwrap_err().field,
            "cron"
        );
        assert_eq!(
            CronSpec::parse("61 * * * *", "UTC").unwrap_err().field,
            "cron"
        );
        assert_eq!(
            CronSpec::parse("* * * * *", "Mars/Olympus")
                .unwrap_err()
                .field,
            "timezone"
        );
        let body = serde_json::json!({"cron": "* * * * *", "job": {"kind": "system.noop", "input": {}, "delay_s": 5}});
        assert_eq!(
            CreateScheduleRequest::parse(&body).unwrap_err().field,
            "job.delay_s"
        );
        assert_eq!(
            nest_field("job", FieldError::invalid("input.model", "x")).field,
            "job.input.model"
        );
    }
}
