"""The demo pipeline: page views and purchases of a web shop (the contract the demo and tests rely on)."""

from datetime import timedelta

from lambdalake import Field, Pipeline, Source, View, approx_distinct, count, max_, mean, min_, sum_

pageviews = Source(
    name="pageviews",
    topic="clickstream.pageviews",
    key="user_id",
    event_id="event_id",
    event_time="event_time",
    fields=[
        Field.string("event_id", min_length=1, max_length=128),
        Field.timestamp("event_time"),
        Field.string("user_id", min_length=1),
        Field.string("url", min_length=1, max_length=2048),
        Field.string("referrer", min_length=0, required=False, nullable=True),
        Field.integer("duration_ms", minimum=0, maximum=86_400_000),
    ],
)

purchases = Source(
    name="purchases",
    topic="clickstream.purchases",
    key="user_id",
    event_id="event_id",
    event_time="event_time",
    fields=[
        Field.string("event_id", min_length=1, max_length=128),
        Field.timestamp("event_time"),
        Field.string("user_id", min_length=1),
        Field.string("product_id", min_length=1),
        Field.integer("amount_cents", minimum=1, maximum=1_000_000_000),
        Field.string("currency", pattern=r"^[A-Z]{3}$"),
    ],
)

pipeline = Pipeline(
    name="clickstream",
    sources=[pageviews, purchases],
    views=[
        View(
            "pageviews_hourly",
            source="pageviews",
            keys=["url"],
            bucket=timedelta(hours=1),
            aggregates=[
                count("views"),
                sum_("total_duration_ms", "duration_ms"),
                max_("max_duration_ms", "duration_ms"),
                mean("mean_duration_ms", "duration_ms"),
                approx_distinct("unique_users", "user_id"),  # an HLL sketch per row (lambdalake.sketches)
            ],
        ),
        View(
            "revenue_daily",
            source="purchases",
            keys=["product_id", "currency"],
            bucket=timedelta(days=1),
            aggregates=[
                count("orders"),
                sum_("revenue_cents", "amount_cents"),
                min_("min_amount_cents", "amount_cents"),
                max_("max_amount_cents", "amount_cents"),
            ],
        ),
        View(
            "user_activity_daily",
            source="pageviews",
            keys=["user_id"],
            bucket=timedelta(days=1),
            aggregates=[count("pageviews"), sum_("total_duration_ms", "duration_ms")],
        ),
    ],
)
