//! The hot path on a real Redis Cluster: three masters on private ports, started once for this
//! test binary (tests keep apart by namespace). Every script touches one hash slot, so
//! admission, settlement, release and the usage syncer run unchanged — no CROSSSLOT, no MOVED
//! left unanswered — and keys of different shards spread over different masters.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::hot_suite::{self, PgLookupCounter, Settings};
use common::private_redis::{shared_cluster, RedisCluster};
use common::*;
use serde_json::{json, Value};
use tollgate::hot::layout::{Layout, SHARDS};

/// A namespace whose 16 shard hash tags fall on all three masters, so placement is testable.
fn spread_namespace(cluster: &RedisCluster) -> (String, Vec<usize>) {
    for _ in 0..50 {
        let ns = unique("c");
        let nodes = shard_nodes(cluster, &ns);
        if nodes.iter().collect::<BTreeSet<_>>().len() == RedisCluster::MASTERS {
            return (ns, nodes);
        }
    }
    panic!("no namespace spreads its shards over every master");
}

/// The master serving each shard's hash tag `{<ns>.<shard>}`.
fn shard_nodes(cluster: &RedisCluster, ns: &str) -> Vec<usize> {
    (0..SHARDS)
        .map(|s| cluster.node_of_slot(cluster.keyslot(&format!("{{{ns}.{s:x}}}"))))
        .collect()
}

async fn cluster_app(cluster: &RedisCluster, namespace: Option<String>) -> TestApp {
    cluster_app_with(cluster, move |s| {
        if let Some(ns) = namespace {
            s.insert("TOLLGATE_REDIS_NAMESPACE", ns);
        }
    })
    .await
}

async fn cluster_app_with(cluster: &RedisCluster, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let url = cluster.url();
    spawn_app_with(move |s| {
        s.insert("TOLLGATE_REDIS_URL", url);
        tweak(s);
    })
    .await
}

/// Runs one `hot_suite` scenario against a tollgate on the shared cluster, started with the
/// settings tweak the scenario needs.
macro_rules! on_cluster {
    ($scenario:ident) => {
        on_cluster!($scenario, |_: &mut Settings| {});
    };
    ($scenario:ident, $tweak:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $scenario() {
            let app = cluster_app_with(shared_cluster().await, $tweak).await;
            hot_suite::$scenario(&app).await;
        }
    };
}

mod state_format_two {
    //! The scenarios whose leases hold something, in `TOLLGATE_STATE_FORMAT=2`: the hold in
    //! a live-set member and a lease id names no key of another slot.
    use super::*;

    macro_rules! in_format_two {
        ($scenario:ident) => {
            in_format_two!($scenario, |_: &mut Settings| {});
        };
        ($scenario:ident, $tweak:expr) => {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let app = cluster_app_with(shared_cluster().await, |s: &mut Settings| {
                    s.insert("TOLLGATE_STATE_FORMAT", "2".into());
                    ($tweak)(s);
                })
                .await;
                hot_suite::$scenario(&app).await;
            }
        };
    }

    in_format_two!(parallel_reservations_never_exceed_the_balance);
    in_format_two!(reserve_holds_add_up);
    in_format_two!(release_frees_the_lease_and_a_later_settlement_still_charges);
    in_format_two!(token_limits_admit_exactly_what_fits);
    in_format_two!(
        an_expired_lease_frees_its_slot_and_its_hold,
        hot_suite::short_lease
    );
}

mod suite {
    //! Every scenario of `common::hot_suite` on the cluster, except
    //! `lost_redis_state_is_rehydrated_from_postgres`, which wipes the namespace through the
    //! harness's single-node connection; its cluster version is
    //! `lost_cluster_state_is_rehydrated_from_postgres` below.
    use super::*;

    hot_suite::every_scenario!(on_cluster);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_keys_cost_bounded_postgres_lookups() {
        let pg = PgLookupCounter::start().await;
        let app = cluster_app_with(shared_cluster().await, |s| pg.route(s)).await;
        hot_suite::unknown_keys_cost_bounded_postgres_lookups(&app, &pg).await;
    }
}

fn shard_of(key: &str) -> usize {
    let hash = tollgate::keys::hash(key);
    usize::from_str_radix(&hash[..1], 16).expect("hex")
}

async fn stats(app: &TestApp, key_id: &str) -> Value {
    let res = app.admin_get(&format!("/admin/keys/{key_id}/stats")).await;
    assert_eq!(res.status(), 200);
    res.json().await.expect("stats json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_settle_release_work_on_a_three_master_cluster() {
    let cluster = shared_cluster().await;
    let app = cluster_app(cluster, None).await;
    let command_errors = app
        .metric_sum("tollgate_redis_errors_total", Some("kind=\"command\""))
        .await;

    let (key, api_key) = app
        .create_key(json!({"user_id": "u-c1", "rate_limit": 3, "concurrent_limit": 2}))
        .await;
    let (status, a) = app.admit(&key, json!({"model": "gpt-4o"})).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["key_id"], api_key["id"]);
    assert_eq!(a["rate_limit"]["remaining"], 2, "{a}");
    assert_eq!(a["concurrency"]["in_flight"], 1, "{a}");
    let (status, b) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{b}");
    let (status, c) = app.admit(&key, json!({})).await;
    assert_eq!(status, 429, "two leases live: {c}");
    assert_eq!(c["code"], "concurrency_limited", "{c}");

    let lease_a = a["lease_id"].as_str().expect("lease");
    let (status, s) = app.settle(lease_a, "0.5").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["settled"], true);
    assert_eq!(s["duplicate"], false);
    let (status, s) = app.settle(lease_a, "0.5").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        s["duplicate"], true,
        "a retried settlement is recognised: {s}"
    );
    let (status, r) = app.release(b["lease_id"].as_str().expect("lease")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["released"], true);
    let (status, r) = app.release(b["lease_id"].as_str().expect("lease")).await;
    assert_eq!(status, 200, "release is idempotent: {r}");

    // Slots are free again, and the window still counts the two admissions.
    let (status, d) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["rate_limit"]["remaining"], 0, "{d}");
    let (status, e) = app.admit(&key, json!({})).await;
    assert_eq!(status, 429, "{e}");
    assert_eq!(e["code"], "rate_limited", "{e}");

    let unknown = format!("{}.{}", "ab".repeat(16), "A".repeat(22));
    let (status, u) = app.settle(&unknown, "0.1").await;
    assert_eq!(status, 404, "{u}");
    assert_eq!(u["code"], "lease_unknown");
    let (status, body) = app
        .admit("sk-notakey000000000000000000000000000", json!({}))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "key_invalid");

    // A standalone balance is charged and held on the cluster like anywhere else.
    let (funded, funded_key) = app
        .create_key(json!({"user_id": "u-c1", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let (status, g) = app.admit(&funded, json!({"reserve_usd": 0.4})).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(
        nanos(&g["balance_remaining_usd"]),
        600_000_000,
        "the hold is taken: {g}"
    );
    let (status, h) = app.admit(&funded, json!({"reserve_usd": 0.7})).await;
    assert_eq!(status, 402, "{h}");
    assert_eq!(h["code"], "balance_exhausted");
    let (status, s) = app
        .settle(g["lease_id"].as_str().expect("lease"), "0.3")
        .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(nanos(&s["balance_remaining_usd"]), 700_000_000, "{s}");

    // An admin write reaches the cluster at once.
    let id = api_key["id"].as_str().expect("id");
    let res = app
        .admin_patch(&format!("/admin/keys/{id}"), json!({"is_active": false}))
        .await;
    assert_eq!(res.status(), 200);
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "key_disabled");

    let res = app
        .http
        .get(format!("{}/readyz", app.data))
        .send()
        .await
        .expect("readyz");
    assert_eq!(res.status(), 200, "ready on a cluster");
    let errors = app
        .metric_sum("tollgate_redis_errors_total", Some("kind=\"command\""))
        .await
        - command_errors;
    assert_eq!(
        errors, 0.0,
        "no command errors (CROSSSLOT, MOVED) on the cluster"
    );
    let funded_id = funded_key["id"].as_str().expect("id").to_string();
    let synced = app
        .eventually(Duration::from_secs(15), || async {
            stats(&app, &funded_id).await["total_requests"].as_i64() == Some(1)
        })
        .await;
    assert!(synced, "the funded key's settlement reached Postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_different_shards_land_on_different_masters() {
    let cluster = shared_cluster().await;
    let (ns, nodes) = spread_namespace(cluster);
    let app = cluster_app(cluster, Some(ns.clone())).await;
    let layout = Layout::new(&ns);

    // Keys until every master serves at least one of them.
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut covered = BTreeSet::new();
    for _ in 0..200 {
        if covered.len() == RedisCluster::MASTERS {
            break;
        }
        let (key, _) = app.create_key(json!({"user_id": "u-spread"})).await;
        let node = nodes[shard_of(&key)];
        covered.insert(node);
        keys.push((key, node));
    }
    assert_eq!(
        covered.len(),
        RedisCluster::MASTERS,
        "keys over every master"
    );
    for (key, _) in &keys {
        let (status, body) = app.admit(key, json!({})).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = app
            .settle(body["lease_id"].as_str().expect("lease"), "0.001")
            .await;
        assert_eq!(status, 200, "{body}");
    }

    let on_node: Vec<BTreeSet<String>> = (0..RedisCluster::MASTERS)
        .map(|n| {
            cluster
                .node_keys(n, &format!("{ns}:*"))
                .into_iter()
                .collect()
        })
        .collect();
    for (n, found) in on_node.iter().enumerate() {
        assert!(
            !found.is_empty(),
            "master {n} holds none of this namespace's keys"
        );
    }
    for (key, node) in &keys {
        let k = layout.for_hash(&tollgate::keys::hash(key));
        // Every Redis key of one API key is on the master its shard's tag names, and nowhere else.
        for name in [&k.state, &k.rate, &k.stream()] {
            assert!(
                on_node[*node].contains(name),
                "{name} is not on master {node}: {:?}",
                on_node[*node]
            );
            for (other, found) in on_node.iter().enumerate() {
                if other != *node {
                    assert!(!found.contains(name), "{name} also on master {other}");
                }
            }
            assert_eq!(cluster.node_of_slot(cluster.keyslot(name)), *node, "{name}");
        }
    }
    // Every key of the namespace carries a shard tag and sits on that shard's master; each
    // shard's usage stream (created by the syncer for all 16) sits there too.
    let layout_streams = layout.streams();
    for (n, found) in on_node.iter().enumerate() {
        for name in found {
            let open = name
                .find('{')
                .unwrap_or_else(|| panic!("{name} has no hash tag"));
            let close = name[open..].find('}').expect("tag closes") + open;
            let tag = &name[open + 1..close];
            let shard = tag
                .strip_prefix(&format!("{ns}."))
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .unwrap_or_else(|| panic!("{name}: tag {tag} is not a shard of {ns}"));
            assert_eq!(nodes[shard], n, "{name} (shard {shard:x}) on master {n}");
        }
    }
    for (shard, stream) in layout_streams.iter().enumerate() {
        assert!(
            on_node[nodes[shard]].contains(stream),
            "{stream} on master {}",
            nodes[shard]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_every_shard_reaches_postgres_on_a_cluster() {
    let cluster = shared_cluster().await;
    let (ns, nodes) = spread_namespace(cluster);
    let app = cluster_app(cluster, Some(ns.clone())).await;

    // One key per master, three settlements each.
    let mut per_node: HashMap<usize, (String, String)> = HashMap::new();
    for _ in 0..200 {
        if per_node.len() == RedisCluster::MASTERS {
            break;
        }
        let (key, api_key) = app
            .create_key(
                json!({"user_id": "u-sync", "is_standalone": true, "initial_balance_usd": 10}),
            )
            .await;
        let id = api_key["id"].as_str().expect("id").to_string();
        per_node.entry(nodes[shard_of(&key)]).or_insert((key, id));
    }
    assert_eq!(
        per_node.len(),
        RedisCluster::MASTERS,
        "a key on every master"
    );
    for (key, _) in per_node.values() {
        for cost in [0.1, 0.2, 0.3] {
            let (status, a) = app.admit(key, json!({})).await;
            assert_eq!(status, 200, "{a}");
            let res = app
                .post_data(
                    "/v1/settle",
                    json!({"lease_id": a["lease_id"], "cost_usd": cost, "input_tokens": 10, "output_tokens": 5}),
                )
                .await;
            assert_eq!(res.status(), 200);
        }
    }
    for (node, (key, id)) in &per_node {
        let synced = app
            .eventually(Duration::from_secs(15), || async {
                stats(&app, id).await["total_requests"].as_i64() == Some(3)
            })
            .await;
        assert!(synced, "usage of the key on master {node} reached Postgres");
        let s = stats(&app, id).await;
        assert_eq!(s["total_tokens"], 45, "{s}");
        assert_eq!(nanos(&s["total_cost_usd"]), 600_000_000, "{s}");
        let k: Value = app
            .admin_get(&format!("/admin/keys/{id}"))
            .await
            .json()
            .await
            .expect("key");
        assert_eq!(nanos(&k["balance_used_usd"]), 600_000_000, "{k}");
        assert!(!k["last_used_at"].is_null(), "{k}");
        // Synced entries are deleted from the shard's stream on its master.
        let stream = Layout::new(&ns)
            .for_hash(&tollgate::keys::hash(key))
            .stream();
        let drained = app
            .eventually(Duration::from_secs(10), || async {
                cluster.cli(*node, &["XLEN", &stream]).trim() == "0"
            })
            .await;
        assert!(drained, "{stream} on master {node} is drained");
    }
    // Exactly once: nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (_, id) in per_node.values() {
        assert_eq!(stats(&app, id).await["total_requests"], 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_on_every_master_is_recovered() {
    let cluster = shared_cluster().await;
    let app = cluster_app(cluster, None).await;
    let sha = tollgate::hot::scripts::Scripts::default()
        .admit
        .sha()
        .to_string();
    let (key, _) = app
        .create_key(json!({"user_id": "u-flush", "concurrent_limit": null}))
        .await;
    let (status, a) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{a}");

    cluster.script_flush_all();
    let (status, b) = app.admit(&key, json!({})).await;
    assert_eq!(
        status, 200,
        "admission right after SCRIPT FLUSH on every master: {b}"
    );
    let (status, s) = app
        .settle(a["lease_id"].as_str().expect("lease"), "0.01")
        .await;
    assert_eq!(status, 200, "settle after SCRIPT FLUSH: {s}");
    let (status, r) = app.release(b["lease_id"].as_str().expect("lease")).await;
    assert_eq!(status, 200, "release after SCRIPT FLUSH: {r}");
    // The master serving this key cached the admit script again through the EVAL fallback.
    let slot = cluster.keyslot(
        &tollgate::hot::layout::Layout::new(&app.namespace)
            .for_hash(&tollgate::keys::hash(&key))
            .state,
    );
    let node = cluster.node_of_slot(slot);
    assert_eq!(cluster.cli(node, &["SCRIPT", "EXISTS", &sha]).trim(), "1");
    let res = app
        .http
        .get(format!("{}/readyz", app.data))
        .send()
        .await
        .expect("readyz");
    assert_eq!(res.status(), 200, "the probe recovers too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_cluster_never_exceed_the_concurrency_limit_together() {
    let cluster = shared_cluster().await;
    let app = cluster_app(cluster, None).await;
    let replica = app.replica().await;
    const LIMIT: usize = 3;
    let (key, _) = app
        .create_key(json!({"user_id": "u-race", "concurrent_limit": LIMIT, "rate_limit": null}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (http, base) = if i % 2 == 0 {
            (app.http.clone(), app.data.clone())
        } else {
            (replica.http.clone(), replica.data.clone())
        };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let res = http
                .post(format!("{base}/v1/admit"))
                .json(&json!({"key": key}))
                .send()
                .await
                .expect("admit");
            res.status().as_u16()
        }));
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        *by_status.entry(t.await.expect("task")).or_default() += 1;
    }
    assert_eq!(by_status.get(&200).copied(), Some(LIMIT), "{by_status:?}");
    assert_eq!(
        by_status.get(&429).copied(),
        Some(12 - LIMIT),
        "{by_status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_cluster_state_is_rehydrated_from_postgres() {
    let cluster = shared_cluster().await;
    let (ns, _) = spread_namespace(cluster);
    let app = cluster_app(cluster, Some(ns.clone())).await;
    let (key, api_key) = app
        .create_key(
            json!({"user_id": "u-lost", "is_standalone": true, "initial_balance_usd": 1,
                           "rate_limit": 2, "allowed_models": ["m1"]}),
        )
        .await;
    let id = api_key["id"].as_str().expect("id").to_string();
    let (status, a) = app.admit(&key, json!({"model": "m1"})).await;
    assert_eq!(status, 200, "{a}");
    let (status, s) = app
        .settle(a["lease_id"].as_str().expect("lease"), "0.25")
        .await;
    assert_eq!(status, 200, "{s}");
    let synced = app
        .eventually(Duration::from_secs(15), || async {
            stats(&app, &id).await["total_requests"].as_i64() == Some(1)
        })
        .await;
    assert!(synced, "the settlement reached Postgres before the wipe");

    // Every master loses this namespace (streams and consumer groups included).
    let pattern = format!("{ns}:*");
    for node in 0..RedisCluster::MASTERS {
        for name in cluster.node_keys(node, &pattern) {
            cluster.cli(node, &["DEL", &name]);
        }
    }
    // The syncer recreates its streams at once; the key state must stay gone.
    for node in 0..RedisCluster::MASTERS {
        let left = cluster.node_keys(node, &format!("{ns}:*:k:*"));
        assert!(
            left.is_empty(),
            "master {node} still has key state: {left:?}"
        );
    }

    let (status, b) = app.admit(&key, json!({"model": "m1"})).await;
    assert_eq!(status, 200, "first admission after the wipe: {b}");
    assert_eq!(
        nanos(&b["balance_remaining_usd"]),
        750_000_000,
        "the synced spend survived: {b}"
    );
    assert_eq!(b["rate_limit"]["limit"], 2, "{b}");
    let (status, c) = app.admit(&key, json!({"model": "m2"})).await;
    assert_eq!(status, 403, "the allow-list came back too: {c}");
    let (status, s) = app
        .settle(b["lease_id"].as_str().expect("lease"), "0.05")
        .await;
    assert_eq!(status, 200, "{s}");
    // The syncer recreates its consumer group on the wiped stream and carries on.
    let synced = app
        .eventually(Duration::from_secs(15), || async {
            stats(&app, &id).await["total_requests"].as_i64() == Some(2)
        })
        .await;
    assert!(synced, "usage after the wipe reached Postgres");
    let k: Value = app
        .admin_get(&format!("/admin/keys/{id}"))
        .await
        .json()
        .await
        .expect("key");
    assert_eq!(nanos(&k["balance_used_usd"]), 300_000_000, "{k}");
}
