"""An order-lines pipeline: decimal prices, discounts and taxes, a boolean flag, a float weight, and filtered views.

The example of docs/pipelines.md ("Field types and filters"): a source declared directly with the richer field
types::

    lambdalake load order_lines.csv --source order_lines --pipeline lambdalake.pipelines.orders
"""

from datetime import timedelta

from lambdalake import Field, Pipeline, Source, View, and_, count, eq, ge, in_, is_null, lt, max_, mean, min_, or_, sum_

order_lines = Source(
    name="order_lines", topic="shop.order_lines", key="order_id", event_id="line_id", event_time="ordered_at",
    fields=[
        Field.string("line_id", max_length=64),
        Field.timestamp("ordered_at"),
        Field.string("order_id", max_length=64),
        Field.string("sku", max_length=32),
        Field.string("currency", pattern=r"[A-Z]{3}"),
        Field.integer("quantity", minimum=1, maximum=10_000),
        Field.decimal("price", scale=2),                      # 19.99
        Field.decimal("discount", scale=2, required=False),   # absent: no discount
        Field.decimal("tax", scale=4),                        # 1.6793
        Field.boolean("returned"),
        Field.number("weight_kg", required=False),
    ],
)

pipeline = Pipeline(
    "orders",
    sources=[order_lines],
    views=[
        # Q1 2026 sales of lines not returned, per currency and day
        View("sales_q1_daily", source="order_lines", keys=["currency"], bucket=timedelta(days=1),
             aggregates=[count("lines"), sum_("revenue", "price"), sum_("discounts", "discount"), sum_("tax", "tax"),
                         max_("max_price", "price"), mean("avg_price", "price"), sum_("weight_kg", "weight_kg")],
             where=and_(ge("ordered_at", "2026-01-01T00:00:00Z"), lt("ordered_at", "2026-04-01T00:00:00Z"),
                        eq("returned", False))),
        # lines of two product families or without a discount, per returned flag and hour
        View("lines_by_flag_hourly", source="order_lines", keys=["returned"], bucket=timedelta(hours=1),
             aggregates=[count("lines"), min_("min_weight_kg", "weight_kg"), max_("max_tax", "tax")],
             where=or_(in_("sku", ["A-1", "B-2"]), is_null("discount"))),
    ],
)
