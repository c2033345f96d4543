"""The operator's tasks by namespace (tasks.py composes them): stacks, vm, system, gpu, images,
views, dev; common.py is what they share."""
