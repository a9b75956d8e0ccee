//! One participant per database: a second one, under another shard name or the same, refuses to
//! start and names the participant that holds the database; once that one stops, a successor
//! starts.

use tokio::net::TcpListener;
use treaty_participant::ParticipantError;
use treaty_proto::ShardName;

use crate::support::{Env, SERVER};

async fn start_another(config: treaty_participant::Config) -> Result<(), ParticipantError> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Returns at once with the refusal; were it to start, the test would hang here, so bound it.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        treaty_participant::run(config, listener, std::future::pending()),
    )
    .await
    .expect("a second participant on the same database must refuse to start, not serve")
}

#[tokio::test]
async fn a_second_participant_on_the_same_database_refuses_to_start() {
    let _shared = SERVER.read().await;
    let Some(mut env) = Env::start("claimed", |_| {}).await else {
        return;
    };
    // Env::start returns once the listener accepts; a call proves the participant serves, so it
    // has taken the database.
    let warm_up = env.gid(100);
    env.execute(&warm_up, "SELECT 1", vec![]).await.unwrap();
    env.abort(&warm_up).await.unwrap();
    for name in ["s1", "s0"] {
        let mut config = env.config();
        config.shard = ShardName::new(name).unwrap();
        let Err(error) = start_another(config).await else {
            panic!("shard {name} started on a database that shard s0 serves");
        };
        let message = error.to_string();
        assert!(
            matches!(error, ParticipantError::DatabaseClaimed { .. }),
            "{message}"
        );
        assert!(
            message.contains(&format!("database {} is already served", env.db.name))
                && message.contains("treaty-participant shard=s0"),
            "{message}"
        );
    }

    // The holder stops; its successor takes the database (restart_participant starts it and
    // waits until it serves).
    env.restart_participant(env.config()).await;
    let gid = env.gid(1);
    env.execute(&gid, "SELECT 1", vec![]).await.unwrap();
}
