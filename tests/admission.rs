//! The hot path against a single Redis: every scenario of `common::hot_suite`, each on its own
//! tollgate with its own database and namespace.

mod common;

use common::hot_suite::{self, PgLookupCounter};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_admissions_never_exceed_the_rate_limit() {
    let app = spawn_app().await;
    hot_suite::parallel_admissions_never_exceed_the_rate_limit(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_admissions_never_exceed_the_concurrency_limit() {
    let app = spawn_app().await;
    hot_suite::parallel_admissions_never_exceed_the_concurrency_limit(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_reservations_never_exceed_the_balance() {
    let app = spawn_app().await;
    hot_suite::parallel_reservations_never_exceed_the_balance(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_admission_consumes_nothing() {
    let app = spawn_app().await;
    hot_suite::a_denied_admission_consumes_nothing(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_in_the_contract_order() {
    let app = spawn_app().await;
    hot_suite::checks_run_in_the_contract_order(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lists_admit_only_listed_values() {
    let app = spawn_app().await;
    hot_suite::allow_lists_admit_only_listed_values(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_window_slides() {
    let app = spawn_app_with(hot_suite::short_window).await;
    hot_suite::the_rate_window_slides(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_frees_its_slot_and_its_hold() {
    let app = spawn_app_with(hot_suite::short_lease).await;
    hot_suite::an_expired_lease_frees_its_slot_and_its_hold(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_settlement_is_still_charged() {
    let app = spawn_app_with(hot_suite::short_lease).await;
    hot_suite::a_late_settlement_is_still_charged(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_charges_exactly_once() {
    let app = spawn_app().await;
    hot_suite::a_settlement_charges_exactly_once(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_leases_are_404() {
    let app = spawn_app().await;
    hot_suite::unknown_and_malformed_leases_are_404(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_frees_the_lease_and_a_later_settlement_still_charges() {
    let app = spawn_app().await;
    hot_suite::release_frees_the_lease_and_a_later_settlement_still_charges(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tiny_charges_sum_exactly() {
    let app = spawn_app().await;
    hot_suite::a_thousand_tiny_charges_sum_exactly(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_holds_add_up() {
    let app = spawn_app().await;
    hot_suite::reserve_holds_add_up(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_amounts_stay_exact() {
    let app = spawn_app().await;
    hot_suite::large_amounts_stay_exact(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_reach_the_next_admission() {
    let app = spawn_app().await;
    hot_suite::admin_changes_reach_the_next_admission(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_redis_state_is_rehydrated_from_postgres() {
    let app = spawn_app().await;
    hot_suite::lost_redis_state_is_rehydrated_from_postgres(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_cost_bounded_postgres_lookups() {
    let pg = PgLookupCounter::start().await;
    let app = spawn_app_with(|s| pg.route(s)).await;
    hot_suite::unknown_keys_cost_bounded_postgres_lookups(&app, &pg).await;
}
