"""modelcd: continuous deployment of machine-learning models onto real-time prediction nodes, on Kafka."""

__version__ = "0.1.0"
