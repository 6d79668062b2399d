-- Revoking a delegation walks its descendants by parent edge.
CREATE INDEX delegation_edges_parent ON delegation_edges (zone_id, parent_edge_id);
