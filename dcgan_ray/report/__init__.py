"""Pages a person opens: the run page (the study report lives with the study, in dcgan_ray.study)."""
