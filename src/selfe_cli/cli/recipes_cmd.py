"""`selfe recipes` (filled in with the recipe loader)."""
