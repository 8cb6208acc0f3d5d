"""Schemas of the raw clickstream events and of the dead-letter table.

The raw schema is what a well-formed source file holds. Readers accept looser
physical types (strings in CSV/JSONL, other timestamp units) and validation
casts them to ``VALID_EVENT_SCHEMA``; a row that cannot be cast becomes a dead
letter carrying its raw values as strings and a reason.
"""
import pyarrow as pa

EVENT_TYPES = (
    "page_view",
    "search",
    "product_view",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
)

# Upper bound on a plausible quantity in one event; larger values are rejected.
MAX_QUANTITY = 1000

RAW_EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string()),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("product_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("quantity", pa.int32()),
        pa.field("search_query", pa.string()),
        pa.field("device", pa.string()),
        pa.field("country", pa.string()),
        pa.field("referrer", pa.string()),
    ],
    metadata={b"clickstream_dp.schema": b"raw_event/v1"},
)

RAW_COLUMNS = tuple(RAW_EVENT_SCHEMA.names)

# Columns without which a row cannot be attributed to a shopper and a day.
REQUIRED_COLUMNS = ("user_id", "event_time", "event_type")

# Validated events: the raw schema plus ``amount`` (price * quantity, the line
# value used by revenue metrics; null where price is null).
VALID_EVENT_SCHEMA = RAW_EVENT_SCHEMA.append(pa.field("amount", pa.float64()))

DEAD_LETTER_SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name in RAW_COLUMNS]
    + [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),
    ],
    metadata={b"clickstream_dp.schema": b"dead_letter/v1"},
)

# Dead-letter reasons, checked in this order; a row gets the first that applies.
REASON_MALFORMED_ROW = "malformed_row"  # unparseable CSV/JSON line, wrong field count
REASON_MISSING_USER_ID = "missing_user_id"  # null, empty or blank privacy unit
REASON_BAD_EVENT_TIME = "bad_event_time"  # null or unparseable timestamp
REASON_OUT_OF_DAY = "out_of_day"  # timestamp outside the run's UTC day
REASON_UNKNOWN_EVENT_TYPE = "unknown_event_type"  # not in EVENT_TYPES
REASON_MISSING_PRODUCT_ID = "missing_product_id"  # product event without a product
REASON_BAD_PRICE = "bad_price"  # unparseable, negative, NaN or infinite
REASON_BAD_QUANTITY = "bad_quantity"  # unparseable, non-integer, < 1 or > MAX_QUANTITY

DEAD_LETTER_REASONS = (
    REASON_MALFORMED_ROW,
    REASON_MISSING_USER_ID,
    REASON_BAD_EVENT_TIME,
    REASON_OUT_OF_DAY,
    REASON_UNKNOWN_EVENT_TYPE,
    REASON_MISSING_PRODUCT_ID,
    REASON_BAD_PRICE,
    REASON_BAD_QUANTITY,
)

# Event types that must name a product.
PRODUCT_EVENT_TYPES = ("product_view", "add_to_cart", "remove_from_cart", "purchase")
