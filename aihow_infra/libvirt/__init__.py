"""libvirt without Pulumi: connections and error translation, power control, and the XML
rendered from ``templates/``. Used by the providers and by the operator's tasks alike."""
