"""The names ingest writes: output columns besides the input's, and the file."""

from __future__ import annotations

from models import columns as cols

ROW_ID = cols.ROW_ID
ROW_NUMBER = "_row_number"
SOURCE_FILE = "_source_file"
REJECT_REASON = "_reject_reason"
RAW_LINE = "_raw_line"  # the raw text of rows that could not be split into fields
#: Input columns may not take these names.
RESERVED = (ROW_ID, ROW_NUMBER, SOURCE_FILE, REJECT_REASON, RAW_LINE)
#: Rejected partitions hold these before the raw input columns, RAW_LINE after.
REJECTED_LEAD = (ROW_NUMBER, SOURCE_FILE, REJECT_REASON)

PART_NAME = "part-00000.parquet"
