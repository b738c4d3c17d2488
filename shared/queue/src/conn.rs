//! Redis connections that work the same on one server and on Redis Cluster.
//!
//! `REDIS_URL` names one server (`redis://`, `rediss://`) or a cluster by some of its nodes
//! (`redis+cluster://host:7000,host:7001`, `rediss+cluster://...`; credentials and options
//! of the first apply to all). [`RedisConn`] is a `ConnectionLike` either way, so every
//! command, script and pipeline of this crate runs unchanged: on a cluster each command goes
//! to the node of its key's slot, and a pipeline whose commands span slots is split into one
//! sub-pipeline per hash tag (sent concurrently, replies put back in order). Every Lua script
//! and transaction stays within one slot by construction (`keys.rs`). Classic pub/sub is
//! cluster-wide, so subscribers simply connect to one node ([`RedisClient::pubsub`]).

use std::time::Duration;

use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Arg, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::keys::hash_tag;

/// Where Redis is: one server, or a cluster reached through its seed nodes.
#[derive(Clone)]
pub enum RedisClient {
    Single(redis::Client),
    Cluster {
        /// Node addresses as given (one `redis://` URL each), for the pub/sub connection.
        nodes: Vec<String>,
    },
}

impl std::fmt::Debug for RedisClient {
    // never prints credentials
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisClient::Single(_) => f.write_str("RedisClient::Single"),
            RedisClient::Cluster { nodes } => {
                write!(f, "RedisClient::Cluster({} nodes)", nodes.len())
            }
        }
    }
}

impl RedisClient {
    /// Parses `url` (see the module docs); nothing is connected yet.
    pub fn open(url: &str) -> RedisResult<RedisClient> {
        let cluster = ["redis+cluster://", "rediss+cluster://"]
            .iter()
            .find_map(|s| {
                url.strip_prefix(s)
                    .map(|rest| (s.replace("+cluster", ""), rest))
            });
        let Some((scheme, rest)) = cluster else {
            return Ok(RedisClient::Single(redis::Client::open(url)?));
        };
        // credentials and the query string of the first node apply to every node
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), rest),
        };
        let (hosts, query) = match hosts.split_once(['/', '?']) {
            Some((h, _)) => {
                let q = hosts.find('?').map(|i| &hosts[i..]).unwrap_or("");
                (h, q)
            }
            None => (hosts, ""),
        };
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}{userinfo}{h}{query}"))
            .collect();
        if nodes.is_empty() {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a redis+cluster:// URL names no node",
            )));
        }
        // validate every node address now, not at the first connection
        for n in &nodes {
            redis::Client::open(n.as_str())?;
        }
        Ok(RedisClient::Cluster { nodes })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisClient::Cluster { .. })
    }

    /// Opens a self-reconnecting connection. `response_timeout` must exceed any BLOCK used on
    /// it.
    pub async fn connect(&self, response_timeout: Duration) -> RedisResult<RedisConn> {
        match self {
            RedisClient::Single(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_secs(3))
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(2)
                    .set_max_delay(1000);
                Ok(RedisConn::Single(
                    ConnectionManager::new_with_config(client.clone(), cfg).await?,
                ))
            }
            RedisClient::Cluster { nodes } => {
                let client = ClusterClient::builder(nodes.clone())
                    .connection_timeout(Duration::from_secs(3))
                    .response_timeout(response_timeout)
                    .retries(3)
                    .build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A pub/sub connection. On a cluster, any node hears every `PUBLISH`: the first node
    /// that answers is used.
    pub async fn pubsub(&self) -> RedisResult<PubSub> {
        match self {
            RedisClient::Single(client) => client.get_async_pubsub().await,
            RedisClient::Cluster { nodes } => {
                let mut last = None;
                for n in nodes {
                    match redis::Client::open(n.as_str())?.get_async_pubsub().await {
                        Ok(ps) => return Ok(ps),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| (ErrorKind::IoError, "no cluster node").into()))
            }
        }
    }
}

/// A connection to one server or to a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => {
                let groups = if pipeline.is_transaction() {
                    Vec::new()
                } else {
                    split_by_slot(pipeline)
                };
                if groups.len() <= 1 {
                    return c.req_packed_commands(pipeline, offset, count);
                }
                let conn = c.clone();
                async move {
                    let sent = groups.iter().map(|(p, _)| {
                        let mut c = conn.clone();
                        async move { c.req_packed_commands(p, 0, p.len()).await }
                    });
                    let replies = futures::future::try_join_all(sent).await?;
                    let mut out = vec![Value::Nil; pipeline.len()];
                    for ((_, at), values) in groups.iter().zip(replies) {
                        for (i, v) in at.iter().zip(values) {
                            out[*i] = v;
                        }
                    }
                    Ok(out.into_iter().skip(offset).take(count).collect())
                }
                .boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// The key a command is routed by, if it has one.
fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(b) => Some(b),
            Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let key = match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let n: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if n == 0 {
                return None;
            }
            args.get(3)?
        }
        b"XREAD" | b"XREADGROUP" => {
            let at = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.get(at + 1)?
        }
        b"XINFO" | b"XGROUP" | b"OBJECT" | b"MEMORY" => args.get(2)?,
        // (PUBLISH counts as keyed by its channel: the cluster client routes a pipeline by its
        // first command with a slot, and refuses one whose commands name different slots)
        b"SCRIPT" | b"PING" | b"INFO" | b"TIME" | b"CLUSTER" => return None,
        _ => args.get(1)?,
    };
    Some(key.to_vec())
}

/// Splits a pipeline into one pipeline per hash tag, each with the positions of its commands
/// in the original. A command without a key (`SCRIPT LOAD`) goes with the next
/// command that has one (so a script is loaded on the node that runs it), or else the last.
fn split_by_slot(pipeline: &Pipeline) -> Vec<(Pipeline, Vec<usize>)> {
    let mut groups: Vec<(Vec<u8>, Pipeline, Vec<usize>)> = Vec::new();
    let mut waiting: Vec<(usize, &Cmd)> = Vec::new();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let Some(key) = routing_key(cmd) else {
            waiting.push((i, cmd));
            continue;
        };
        let tag = hash_tag(&String::from_utf8_lossy(&key)).as_bytes().to_vec();
        let g = match groups.iter().position(|(t, _, _)| *t == tag) {
            Some(g) => g,
            None => {
                groups.push((tag, Pipeline::new(), Vec::new()));
                groups.len() - 1
            }
        };
        let (_, p, at) = &mut groups[g];
        for (j, w) in waiting.drain(..) {
            p.add_command(w.clone());
            at.push(j);
        }
        p.add_command(cmd.clone());
        at.push(i);
    }
    if !waiting.is_empty() {
        if groups.is_empty() {
            groups.push((Vec::new(), Pipeline::new(), Vec::new()));
        }
        let (_, p, at) = groups.last_mut().expect("one group");
        for (j, w) in waiting {
            p.add_command(w.clone());
            at.push(j);
        }
    }
    groups.into_iter().map(|(_, p, at)| (p, at)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_each_node_with_the_shared_credentials() {
        let c = RedisClient::open("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001").unwrap();
        let RedisClient::Cluster { nodes } = c else {
            panic!("not a cluster")
        };
        assert_eq!(
            nodes,
            ["redis://u:pw@10.0.0.1:7000", "redis://u:pw@10.0.0.2:7001"]
        );
        assert!(!RedisClient::open("redis://127.0.0.1:6379")
            .unwrap()
            .is_cluster());
        assert!(RedisClient::open("redis+cluster://").is_err());
        assert!(format!(
            "{:?}",
            RedisClient::open("redis+cluster://u:secret@h:1").unwrap()
        )
        .find("secret")
        .is_none());
    }

    #[test]
    fn a_pipeline_splits_by_hash_tag_and_scripts_load_where_they_run() {
        let mut p = redis::pipe();
        p.get("{a}:epoch")
            .cmd("SCRIPT")
            .arg("LOAD")
            .arg("return 1")
            .cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("{b}:fair")
            .arg("x")
            .xadd("{a}:ev", "*", &[("k", "v")])
            .cmd("PUBLISH")
            .arg("chan")
            .arg("m");
        let groups = split_by_slot(&p);
        let at: Vec<Vec<usize>> = groups.iter().map(|(_, a)| a.clone()).collect();
        assert_eq!(at, vec![vec![0, 3], vec![1, 2], vec![4]]);
        let mut q = redis::pipe();
        q.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("{q}:p1")
            .arg(">");
        assert_eq!(
            routing_key(q.cmd_iter().next().unwrap()).unwrap(),
            b"{q}:p1"
        );
    }
}
