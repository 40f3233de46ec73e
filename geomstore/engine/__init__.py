"""The exact partition engine: model graph, polygon splitting, descent, tables, checks."""
