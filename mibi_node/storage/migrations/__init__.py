"""Alembic migrations of the node's database (``mibi-node db upgrade``).

``env.py`` runs them on the connection that :mod:`mibi_node.storage.schema` hands over, in
that connection's transaction; ``versions/`` holds one file per schema revision, the first
of which (``0001``) creates every table as the node made them before migrations existed.
"""
