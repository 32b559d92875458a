"""Belfry's services, each declared once: the kit iterates over ``SERVICES`` and never names one.

In start order, what others call first: ``belfry up`` starts them in this
order, ``belfry migrate`` applies their migrations in it (after the queue's),
``belfry serve`` accepts these names. Each package has the same shape:
``__main__`` runs it with its settings loader and build function,
``migrations/*.sql`` are read with importlib.resources.
"""

from belfry.service import Declaration

SERVICES = tuple(
    Declaration(name, port, f"{__name__}.{name}")
    for name, port in (
        ("preferences", 50051),
        ("webpush", 50055),
        ("dispatcher", 50052),
        ("batching", 50053),
        ("email", 50054),
        ("mobile", 50056),
        ("webhooks", 50057),
        ("gateway", 50058),
    )
)
