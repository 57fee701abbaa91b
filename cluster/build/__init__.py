"""The distributed index build: plan, job manifest, stages on Ray, merge and publish."""
