"""The dispatcher: the producer API, recipient rules, routing and delivery status."""
