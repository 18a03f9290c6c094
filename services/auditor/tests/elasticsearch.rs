//! The same promise tests against a real Elasticsearch (or OpenSearch) cluster, when
//! `HERALD_TEST_ELASTICSEARCH_URL` names one; each test is skipped, saying why, otherwise.
//! Every stack uses its own index prefix, so the tests share the cluster without meeting.

mod common;

use common::{Backend, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_of_a_pipeline_run_has_every_piece_on_elasticsearch() {
    if let Some(backend) = Backend::elasticsearch() {
        scenarios::the_trail_of_a_pipeline_run_has_every_piece(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_redeliveries_are_never_indexed_twice_on_elasticsearch() {
    if let Some(backend) = Backend::elasticsearch() {
        scenarios::replays_and_redeliveries_are_never_indexed_twice(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_and_do_not_block_on_elasticsearch() {
    if let Some(backend) = Backend::elasticsearch() {
        scenarios::undecodable_messages_are_dead_lettered_and_do_not_block(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_pages_and_refuses_bad_parameters_on_elasticsearch() {
    if let Some(backend) = Backend::elasticsearch() {
        scenarios::search_filters_pages_and_refuses_bad_parameters(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_land_in_the_month_of_their_own_time_on_elasticsearch() {
    if let Some(backend) = Backend::elasticsearch() {
        scenarios::documents_land_in_the_month_of_their_own_time(backend).await;
    }
}
