"""The run folder and what a run reads and writes: prompts and seeds (``prompts``), the folder's records,
resume and metrics file (``folder``), its tables and figures (``outputs``), shards of one folder and who
finishes it (``shard``), the background PNG writer (``writer``)."""
