"""SAP's maths on a :class:`~sap_jax.structure.groups.Structure`: the generator (:mod:`.agn`),
the partial group lasso (:mod:`.penalty`), the resource loss (:mod:`.resource`), the cut's width
arithmetic (:mod:`.cut`) and the norm baselines (:mod:`.baselines`). Plain keyword arguments
only: no config object is read here."""
