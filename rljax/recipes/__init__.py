"""Recipes: whole training runs on a task, reusable by studies and by users (`rljax.recipes.arithmetic`)."""
