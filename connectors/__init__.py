"""Sources and sinks for amstream (installed as `amstream.connectors`).

Connectors speak records and offsets; they never reach into the learning algorithm.
Kafka is imported only by the Kafka modules.
"""
