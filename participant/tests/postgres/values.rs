//! Every Treaty value type through bind parameters and back out of rows, NULL binding, and the
//! clear errors for values or types Treaty does not carry.

use tonic::Code;
use treaty_proto::pb;
use treaty_proto::pb::value::Kind;

use crate::support::{Env, SERVER, int, null, text, value};

const TABLE: &str = "CREATE TABLE every_type (
    id int4 PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    t text, vc varchar(20), c char(3), by bytea,
    n numeric, ts timestamptz, tsn timestamp, d date,
    u uuid, j json, jb jsonb)";

#[tokio::test]
async fn every_value_type_round_trips() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("values", |_| {}).await else {
        return;
    };
    env.db.sql(TABLE).await;
    let gid = env.gid(1);
    let big = "-123456789012345678901234567890.123456789012345678901";
    let micros = 1_700_000_000_123_456;
    let uuid = "123e4567-e89b-12d3-a456-426614174000";
    let params = vec![
        int(1),
        value(Kind::Bool(true)),
        int(-2),
        int(2_000_000_000),
        int(i64::MIN),
        value(Kind::Float64(1.5)),
        value(Kind::Float64(-0.1)),
        text("héllo"),
        text("varchar"),
        text("ab"),
        value(Kind::Bytes(vec![0, 1, 255])),
        value(Kind::Numeric(big.into())),
        value(Kind::TimestamptzMicros(micros)),
        value(Kind::TimestamptzMicros(micros)),
        text("2024-02-29"),
        value(Kind::Uuid(uuid.into())),
        value(Kind::Json("{\"b\": 1, \"a\": [true]}".into())),
        value(Kind::Json("{\"b\": 1, \"a\": [true]}".into())),
    ];
    let inserted = env
        .execute(
            &gid,
            "INSERT INTO every_type VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15::date,$16,$17,$18)",
            params,
        )
        .await
        .unwrap();
    assert_eq!(inserted.rows_affected, 1);

    let result = env
        .execute(&gid, "SELECT * FROM every_type WHERE id = $1", vec![int(1)])
        .await
        .unwrap();
    let types: Vec<&str> = result.columns.iter().map(|c| c.type_name.as_str()).collect();
    assert_eq!(
        types,
        [
            "int4",
            "bool",
            "int2",
            "int4",
            "int8",
            "float4",
            "float8",
            "text",
            "varchar",
            "bpchar",
            "bytea",
            "numeric",
            "timestamptz",
            "timestamp",
            "date",
            "uuid",
            "json",
            "jsonb"
        ]
    );
    let row = &result.rows[0].values;
    let expected = vec![
        int(1),
        value(Kind::Bool(true)),
        int(-2),
        int(2_000_000_000),
        int(i64::MIN),
        value(Kind::Float64(1.5)),
        value(Kind::Float64(-0.1)),
        text("héllo"),
        text("varchar"),
        text("ab "),
        value(Kind::Bytes(vec![0, 1, 255])),
        value(Kind::Numeric(big.into())),
        value(Kind::TimestamptzMicros(micros)),
        value(Kind::TimestamptzMicros(micros)),
        text("2024-02-29"),
        value(Kind::Uuid(uuid.into())),
        // json keeps the text as sent through jsonb's normalization; jsonb normalizes.
        value(Kind::Json("{\"a\": [true], \"b\": 1}".into())),
        value(Kind::Json("{\"a\": [true], \"b\": 1}".into())),
    ];
    assert_eq!(row, &expected);

    // The same values read through the simple protocol (text format) agree.
    let batch = env
        .execute(&gid, "SELECT 1; SELECT * FROM every_type", vec![])
        .await
        .unwrap();
    assert_eq!(batch.rows[0].values, expected);
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed
    );
}

#[tokio::test]
async fn numerics_are_exact_both_ways() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("numerics", |_| {}).await else {
        return;
    };
    let gid = env.gid(1);
    for input in [
        "0",
        "-0.00",
        "1",
        "+3",
        ".5",
        "5.",
        "-12.50",
        "10000",
        "0.0001",
        "0.00005",
        "99999999999999999999999999999999999999.99999999999999999999",
        "NaN",
    ] {
        let result = env
            .execute(
                &gid,
                "SELECT $1::numeric::text, $1::numeric",
                vec![value(Kind::Numeric(input.into()))],
            )
            .await
            .unwrap();
        let values = &result.rows[0].values;
        let Some(Kind::Text(postgres_text)) = &values[0].kind else {
            panic!("{values:?}")
        };
        assert_eq!(values[1], value(Kind::Numeric(postgres_text.clone())), "{input}");
    }
    let result = env
        .execute(&gid, "SELECT 'Infinity'::numeric, 1e-20::numeric", vec![])
        .await
        .unwrap();
    assert_eq!(result.rows[0].values[0], value(Kind::Numeric("Infinity".into())));
    assert_eq!(
        result.rows[0].values[1],
        value(Kind::Numeric("0.00000000000000000001".into()))
    );
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed
    );
}

#[tokio::test]
async fn null_binds_against_any_column_type() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("nulls", |_| {}).await else {
        return;
    };
    env.db
        .sql("CREATE TABLE n (id int4 PRIMARY KEY, i int4, u uuid, ts timestamptz)")
        .await;
    env.db.sql("INSERT INTO n VALUES (1, 5, NULL, NULL)").await;
    let gid = env.gid(1);
    let result = env
        .execute(&gid, "SELECT count(*) FROM n WHERE i = $1", vec![null()])
        .await
        .unwrap();
    assert_eq!(result.rows[0].values, vec![int(0)]);
    env.execute(
        &gid,
        "INSERT INTO n (id, i, u, ts) VALUES ($1, $2, $3, $4)",
        vec![int(2), null(), null(), null()],
    )
    .await
    .unwrap();
    let result = env
        .execute(&gid, "SELECT i, u, ts FROM n WHERE id = $1", vec![int(2)])
        .await
        .unwrap();
    assert_eq!(result.rows[0].values, vec![null(), null(), null()]);
    // The same statement text bound with different types is prepared once per type signature.
    for param in [int(5), null(), int(6)] {
        env.execute(&gid, "SELECT count(*) FROM n WHERE i = $1", vec![param])
            .await
            .unwrap();
    }
    let as_float = env
        .execute(&gid, "SELECT $1::float8 + 0", vec![value(Kind::Float64(2.5))])
        .await
        .unwrap();
    let as_int = env
        .execute(&gid, "SELECT $1::float8 + 0", vec![int(2)])
        .await
        .unwrap();
    assert_eq!(as_float.rows[0].values, vec![value(Kind::Float64(2.5))]);
    assert_eq!(as_int.rows[0].values, vec![value(Kind::Float64(2.0))]);
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed
    );
}

#[tokio::test]
async fn values_treaty_cannot_carry_are_named() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("bad-values", |_| {}).await else {
        return;
    };
    let bad_json = env
        .execute(
            &env.gid(1),
            "SELECT $1::jsonb",
            vec![value(Kind::Json("{".into()))],
        )
        .await
        .unwrap_err();
    assert_eq!(bad_json.code(), Code::InvalidArgument);
    assert!(
        bad_json.message().contains("parameter $1"),
        "{}",
        bad_json.message()
    );

    let gid = env.gid(2);
    let oid = env
        .execute(&gid, "SELECT oid AS class_oid FROM pg_class LIMIT 1", vec![])
        .await
        .unwrap_err();
    assert_eq!(oid.code(), Code::InvalidArgument);
    assert!(oid.message().contains("class_oid"), "{}", oid.message());
    assert!(oid.message().contains("::text"), "{}", oid.message());

    let gid = env.gid(3);
    let infinite = env
        .execute(&gid, "SELECT 'infinity'::timestamptz AS forever", vec![])
        .await
        .unwrap_err();
    assert_eq!(infinite.code(), Code::InvalidArgument);
    assert!(infinite.message().contains("forever"), "{}", infinite.message());

    let gid = env.gid(4);
    let cast = env
        .execute(&gid, "SELECT oid::text FROM pg_class LIMIT 1", vec![])
        .await
        .unwrap();
    assert_eq!(cast.columns[0].type_name, "text");
    let empty = env
        .execute(&gid, "SELECT oid::text AS o FROM pg_class WHERE false", vec![])
        .await
        .unwrap();
    assert_eq!(empty.columns[0].name, "o", "columns come back without rows");
}
