"""Model families: everything that depends on the kind of model (loading, samples, batches, generation,
writers) lives here, chosen once per merge (``choose.family_for``); the engine and the methods never name one.
"""
